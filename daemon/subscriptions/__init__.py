"""Subscriptions: their lifecycle as attempt outcomes drive it, renewals and dunning."""
