"""The block layer: named nodes in a graph, drivers, and their async I/O interface."""
