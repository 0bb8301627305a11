"""Integrations with other training libraries, each behind its own extra.

- ``randkit.integrations.lightning`` (extra ``lightning``): cross-validate a LightningModule
  with Lightning's own ``Trainer`` (``LightningTrial``).

Importing this package imports none of them.
"""
