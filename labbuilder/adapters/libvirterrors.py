"""libvirt's errors as labbuilder's: ``HypervisorError`` with libvirt's code and message.

Every adapter that calls libvirt translates through here, so no ``libvirtError`` leaves
``labbuilder.adapters``; callers branch on ``HypervisorError.code`` (an ``ErrorCode``), never on
a message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ParamSpec, TypeVar

import libvirt

from labbuilder.common.errors import HypervisorError

P = ParamSpec("P")
R = TypeVar("R")


class ErrorCode(IntEnum):
    """libvirt's error codes that labbuilder branches on (``HypervisorError.code``)."""

    NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN
    NO_NETWORK = libvirt.VIR_ERR_NO_NETWORK
    NO_STORAGE_POOL = libvirt.VIR_ERR_NO_STORAGE_POOL
    NO_STORAGE_VOL = libvirt.VIR_ERR_NO_STORAGE_VOL
    NO_DOMAIN_SNAPSHOT = libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT
    NO_SUPPORT = libvirt.VIR_ERR_NO_SUPPORT
    OPERATION_INVALID = libvirt.VIR_ERR_OPERATION_INVALID
    OPERATION_UNSUPPORTED = libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    CONFIG_UNSUPPORTED = libvirt.VIR_ERR_CONFIG_UNSUPPORTED


def error(what: str, err: Any, hint: str | None = None) -> HypervisorError:
    """``HypervisorError`` "<what>: <libvirt's message>" with libvirt's code."""
    detail = str(err.get_error_message())
    return HypervisorError(f"{what}: {detail}", hint, code=err.get_error_code(), detail=detail)


def hypervisor_error(err: BaseException) -> HypervisorError | None:
    """``err`` as ``HypervisorError`` ("libvirt: <its message>", no hint of its own) if libvirt
    raised it, else None: the net for a libvirt error nobody translated with more words."""
    if not isinstance(err, libvirt.libvirtError):
        return None
    return error("libvirt", err)


def translated(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` with a ``libvirtError`` it lets through turned into ``HypervisorError``."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except libvirt.libvirtError as err:
            raise error("libvirt", err) from err

    return wrapper
