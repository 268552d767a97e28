"""The sandbox payment gateway: a real HTTP server that behaves like a payment provider."""
