// Receive the first OrderPlaced event a pgbus publisher sends, from Node with node-postgres.
//
//   node listen.js DSN CHANNEL    prints "listening", then the event
//
// The wire format is docs/reference/wire-format.md.
"use strict";

const { Client } = require("pg");

async function main() {
  const [dsn, channel] = process.argv.slice(2);
  const client = new Client({ connectionString: dsn });
  await client.connect();
  const received = new Promise((resolve) => {
    client.on("notification", (notification) => {
      let envelope;
      try {
        envelope = JSON.parse(notification.payload);
      } catch {
        return; // not JSON
      }
      // an envelope has both "v" and "type"; this reader knows version 1
      if (envelope.v !== 1 || envelope.type !== "OrderPlaced") {
        return;
      }
      resolve(envelope);
    });
  });
  await client.query(`LISTEN ${client.escapeIdentifier(channel)}`);
  console.log("listening");
  const envelope = await received;
  const { order_id, total } = envelope.data;
  console.log(`OrderPlaced id=${envelope.id} order_id=${order_id} total=${total}`);
  await client.end();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
