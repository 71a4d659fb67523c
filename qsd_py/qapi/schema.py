"""The facade the rest of qsd-py uses to ask the QAPI schema things.

:func:`load_schema` reads ``qapi/`` (next to the package) once per process.  Argument
checking has two halves, both derived from the schema files: the JSON Schema of the command
(validated with ``jsonschema``, built lazily per command because importing ``jsonschema``
costs tens of milliseconds) says whether the arguments are valid, and the
:class:`~qsd_py.qapi.visit.Visitor` walk gives the error text QEMU would give and the
normalised arguments (aliases resolved).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from qsd_py.errors import QMPError
from qsd_py.qapi.model import CliOption, Command, Model, QAPIType, build_model
from qsd_py.qapi.parser import parse_schema
from qsd_py.qapi.visit import Visitor

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "qapi")
SCHEMA_FILE = "qapi-schema.json"


class QAPISchema:
    """A loaded schema: commands, events, types, command-line options."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._validators: dict[str, Any] = {}
        self._introspection: list[dict[str, Any]] | None = None
        self._qmp = Visitor(keyval=False)

    # --- commands ---------------------------------------------------------------------------
    def has_command(self, name: str) -> bool:
        return name in self.model.commands

    def command_names(self) -> list[str]:
        """Every command, in definition order (``query-commands`` lists these)."""
        return list(self.model.commands)

    def command(self, name: str) -> Command:
        return self.model.commands[name]

    def command_returns(self, name: str) -> QAPIType | None:
        """The declared return type of ``name`` (None: the command returns ``{}``)."""
        return self.model.commands[name].ret_type

    def event_names(self) -> list[str]:
        return list(self.model.events)

    def check_command_args(
        self, name: str, args: dict[str, Any] | None, *, json_schema: bool = True
    ) -> dict[str, Any]:
        """Validate ``args`` of command ``name``; return them with aliases normalised.

        Raises :class:`QMPError` with QEMU's text for the first problem QEMU would report.
        Defaults are not filled in: handlers apply them. ``json_schema=False`` skips the
        ``jsonschema`` half (start-up options, see :meth:`check_type_value`).
        """
        typ = self.model.commands[name].arg_type
        return self.check_type_value(typ, args or {}, json_schema=json_schema)

    def check_type_value(self, typ: QAPIType | str, value: Any, *, json_schema: bool = True) -> Any:
        """Validate ``value`` against a type (object or its name); return it normalised.

        The walk alone rejects everything the schema forbids; the ``jsonschema`` pass checks
        the same rules a second way. Importing ``jsonschema`` costs ~60 ms, so command-line
        options applied before the first mount skip it (``json_schema=False``) and
        :meth:`warm_up` builds the validators once the daemon is up.
        """
        if isinstance(typ, str):
            typ = self.model.types[typ]
        normalised = self._qmp.visit(typ, value, "", None)
        if not json_schema:
            return normalised
        validator = self.validator(typ)
        if not validator.is_valid(normalised):
            # The walk found nothing but the JSON Schema objects: report what it says.
            error = _best_error(validator, normalised)
            raise QMPError(f"Invalid parameter '{error}'")
        return normalised

    def validator(self, typ: QAPIType) -> Any:
        """The jsonschema validator of ``typ``, built on first use."""
        v = self._validators.get(typ.name)
        if v is None:
            from qsd_py.qapi.jsonschema import type_schema, validator_class

            v = validator_class()(type_schema(typ))
            self._validators[typ.name] = v
        return v

    def warm_up(self) -> None:
        """Build every command's validator now (from a background thread after start-up),
        so the first QMP command does not pay for importing ``jsonschema``."""
        for command in list(self.model.commands.values()):
            self.validator(command.arg_type)

    def json_schema(self, name: str) -> dict[str, Any]:
        """The JSON Schema document of command ``name``'s arguments."""
        from qsd_py.qapi.jsonschema import type_schema

        return type_schema(self.model.commands[name].arg_type)

    # --- introspection ----------------------------------------------------------------------
    def introspect(self) -> list[dict[str, Any]]:
        """The ``query-qmp-schema`` answer (computed once; callers must not modify it)."""
        if self._introspection is None:
            from qsd_py.qapi.introspect import introspect

            self._introspection = introspect(self.model)
        return self._introspection

    # --- command line -----------------------------------------------------------------------
    def cli_option(self, name: str) -> CliOption | None:
        """The schema's declaration of ``--name`` (None for options without arguments)."""
        return self.model.cli_options.get(name)


def _best_error(validator: Any, value: Any) -> str:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    return ".".join(str(p) for p in error.absolute_path) if error else "?"


@functools.cache
def load_schema(directory: str | os.PathLike[str] | None = None) -> QAPISchema:
    """Read and check the schema files (once per process and directory)."""
    root = os.path.join(directory or SCHEMA_DIR, SCHEMA_FILE)
    return QAPISchema(build_model(parse_schema(root)))
