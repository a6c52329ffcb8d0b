"""The version of libportal's cffi module, written once.

_build.py compiles CFFI_ABI into the module (fayt_cffi_abi()) and _abi.py
checks it at import, so a module built from other sources is refused with a
message rather than failing somewhere inside.  Bump it with any change of
what the module declares (include/fayt/*.h) or how it is built.
No imports: _build.py reads this file before libportal can be imported.
"""
CFFI_ABI = 19
