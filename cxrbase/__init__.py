"""The basics every layer of cxr shares, below all of them (cxrbase ← shards ← cxr ← launch).

- :mod:`cxrbase.errors`: the one error type (``CxrError``) and the CLI boundary that prints it;
- :mod:`cxrbase.atomic`: atomic file writes (temp file beside the target, fsync, rename);
- :mod:`cxrbase.labels`: the 14 ChestX-ray14 labels in canonical order and their exact parsing.

No torch, no numpy: importing it is free, so login-node tools (``shards``, ``launch``) use it too.
"""
