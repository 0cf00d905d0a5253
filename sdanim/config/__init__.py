"""The ground floor: settings as small frozen dataclasses, the choices every option
takes, size parsing and the one error type. Imports nothing else of sdanim."""

__version__ = "0.1.0"
