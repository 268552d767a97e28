"""Checkout.com: the adapter (``client``) and its wire types and mapping tables (``transform``)."""
