"""The hook SDK: what a hook uses to speak the hook protocol (docs/hooks.md).

hooklib (status lines, the cleanup journal's helpers, losetup) and journal
(the cleanup journal) are its Python half; lib/img-functions is its bash half.
Hooks import it one way, `from imaging_elements.sdk import hooklib`, on the
host, in the chroot sandbox and in a booted instance: the sandbox binds this
directory, and the instance agent copies it, as imaging_elements/sdk/ on the
hooks' PYTHONPATH.  So it imports the standard library only, never the engine
or a class library (tests/test_layers.py).  This file stays free of code: the
sandbox binds it as imaging_elements/__init__.py as well.
"""
