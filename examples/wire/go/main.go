// A Go publisher and consumer of pgbus events, on pgx (github.com/jackc/pgx/v4).
//
//	go run . publish DSN CHANNEL   sends one OrderPlaced envelope
//	go run . listen DSN CHANNEL    prints "listening", then the first OrderPlaced it receives
//
// The wire format is docs/reference/wire-format.md.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v4"
)

// Envelope is the pgbus envelope, version 1.
type Envelope struct {
	V       int               `json:"v"`
	ID      string            `json:"id"`
	Type    string            `json:"type"`
	TS      float64           `json:"ts"` // seconds since the epoch, not time.Time
	Headers map[string]string `json:"headers,omitempty"`
	Data    json.RawMessage   `json:"data"`
}

// OrderPlaced is the event's data, as the Python model defines it.
type OrderPlaced struct {
	OrderID int    `json:"order_id"`
	Total   string `json:"total"` // a Decimal travels as a string
}

// newID returns 16 random bytes in hex: an id no other event has.
func newID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func publish(ctx context.Context, conn *pgx.Conn, channel string) error {
	data, err := json.Marshal(OrderPlaced{OrderID: 42, Total: "9.90"})
	if err != nil {
		return err
	}
	payload, err := json.Marshal(Envelope{
		V:    1,
		ID:   newID(),
		Type: "OrderPlaced",
		TS:   float64(time.Now().UnixNano()) / 1e9,
		Data: data,
	})
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, "SELECT pg_notify($1, $2)", channel, string(payload))
	return err
}

func listen(ctx context.Context, conn *pgx.Conn, channel string) error {
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		return err
	}
	fmt.Println("listening")
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		var env Envelope
		if err := json.Unmarshal([]byte(n.Payload), &env); err != nil || env.V != 1 {
			continue // not an envelope this reader knows
		}
		if env.Type != "OrderPlaced" {
			continue
		}
		var order OrderPlaced
		if err := json.Unmarshal(env.Data, &order); err != nil {
			return err
		}
		fmt.Printf("OrderPlaced id=%s order_id=%d total=%s\n", env.ID, order.OrderID, order.Total)
		return nil
	}
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: wire publish|listen DSN CHANNEL")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close(context.Background())
	switch os.Args[1] {
	case "publish":
		err = publish(ctx, conn, os.Args[3])
	case "listen":
		err = listen(ctx, conn, os.Args[3])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
