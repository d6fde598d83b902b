"""Phase handlers: code outside the engine that runs a phase's accepted hooks
(instance-validate boots the image and runs them in the guest).

The phase table names a handler (phases.Phase.handler); a class library
registers it here by that name (imaging_elements/api.py wires the stock ones),
so that the engine never imports a class library.

A handler is called as handler(hooks, env, journal, emit) with hooks a list
of (name, path), env the process's IMG_* variables, journal the cleanup
journal and emit(message) for each status message of the guest; it returns
one result dict per hook ({"hook", "ok", "skipped", "description", "output",
"duration"}) and raises HandlerError for a failure of the phase itself."""


class HandlerError(Exception):
    pass


_handlers = {}


def register(name, handler):
    _handlers[name] = handler


def get(name):
    """The handler registered as `name`, or None."""
    return _handlers.get(name)
