"""Stripe: off-session PaymentIntents on saved payment methods (see docs/providers/stripe.md)."""
