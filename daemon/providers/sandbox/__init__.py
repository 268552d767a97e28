"""The sandbox gateway: a real HTTP payment gateway for tests, demos and load, and its adapter."""
