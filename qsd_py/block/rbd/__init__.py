"""The ``rbd`` driver's parts: librados' and librbd's C API through ctypes with the I/O
handle and its completions (``capi``), handing the results of blocking calls made on their
own threads to the waiting loop (``completions``), and Ceph's own Python bindings
(``bindings``), which the probes in scripts/ compare with."""
