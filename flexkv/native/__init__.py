"""Thin wrappers over the C modules in ``c_src/``.

Each C file has exactly one wrapper module here; only that wrapper imports the raw cffi module
(``flexkv.native._<name>``) and it turns C error codes into Python exceptions. ``blockids`` (pure
Python) is the bad-block-id message both copy wrappers share.
"""
