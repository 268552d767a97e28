"""Adyen Checkout API: off-session subscription charges against a stored card token."""
