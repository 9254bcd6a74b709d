"""Training side: simulate labeled events, fit autoencoders, write model bundles."""
