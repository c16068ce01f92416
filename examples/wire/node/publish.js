// Publish one OrderPlaced event to pgbus subscribers, from Node with node-postgres.
//
//   node publish.js DSN CHANNEL
//
// The wire format is docs/reference/wire-format.md.
"use strict";

const crypto = require("node:crypto");
const { Client } = require("pg");

async function main() {
  const [dsn, channel] = process.argv.slice(2);
  const client = new Client({ connectionString: dsn });
  await client.connect();
  try {
    const envelope = {
      v: 1,
      id: crypto.randomUUID(), // unique per event: receivers drop an id seen recently
      type: "OrderPlaced",
      ts: Date.now() / 1000, // seconds since the epoch: Date.now() is milliseconds
      data: { order_id: 42, total: "9.90" }, // a Decimal travels as a string
    };
    await client.query("SELECT pg_notify($1, $2)", [channel, JSON.stringify(envelope)]);
  } finally {
    await client.end();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
