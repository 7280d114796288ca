"""The domain: what keys, images, signatures and releases are, and the rules that govern them."""
