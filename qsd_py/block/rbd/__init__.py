"""The ``rbd`` driver's parts: reaching Ceph's own Python bindings (``bindings``) and
handing librbd's completions to the asyncio loops that wait for them (``completions``)."""
