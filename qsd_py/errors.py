"""The one exception type that becomes a QMP error reply or a CLI error line."""


class QMPError(Exception):
    """An error with QEMU's class and description text.

    QMP turns it into ``{"error": {"class": ..., "desc": ...}}``; the command line prints
    ``qsd-py: <option>: <desc>``. Layers raise it with QEMU's exact wording so that clients
    written against qemu-storage-daemon see the same texts.
    """

    def __init__(
        self, desc: str, error_class: str = "GenericError", *, hint: str | None = None
    ) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
        # QEMU's error hint: a line the command line prints after the error, QMP never sends.
        self.hint = hint
