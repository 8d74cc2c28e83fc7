"""One exception hierarchy. Every message tells the user what is wrong and what to do next.

Library code raises these; only ``labbuilder.cli.main`` prints them and chooses the exit code.
"""

from __future__ import annotations


class LabbuilderError(Exception):
    """Base of every error labbuilder reports to a user.

    ``message`` says what is wrong (naming the file, key, object or host involved);
    ``hint`` says what to do next. ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class UsageError(LabbuilderError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class LabFileError(LabbuilderError):
    """A lab file (or a built-in lab) is not valid. Raised before anything is created."""

    exit_code = 2


class PlanError(LabbuilderError):
    """The lab cannot be planned on this host (overlapping subnets, not enough memory, ...)."""

    exit_code = 2


class HostError(LabbuilderError):
    """Something on the host (a program, a daemon, a permission) is missing or broken."""


class HypervisorError(LabbuilderError):
    """libvirt refused or failed an operation.

    ``code`` is libvirt's error code (``labbuilder.adapters.libvirt.ErrorCode``) and ``detail``
    libvirt's own message, when the error came from libvirt: callers branch on the code, never
    on a message.
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        code: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.code = code
        self.detail = detail


class DiskSpaceError(HostError):
    """The host has too little free disk for what was asked (refused before it started)."""


class ImageError(LabbuilderError):
    """An image could not be found, downloaded, verified or built."""


class ImageRefusedError(ImageError):
    """An image's content would make a guest read another file of the host (a qcow2 backing
    file or external data file): refused before any lab object uses it."""

    exit_code = 2


class RecipeError(LabbuilderError):
    """An install recipe (its folder, a stage file or a template) is not valid."""

    exit_code = 2


class InstallError(LabbuilderError):
    """An install step or its check failed in a guest; the message is the failure report."""


class GuestCommandError(LabbuilderError):
    """A command inside a guest failed."""


class GuestTransportError(GuestCommandError):
    """The SSH connection to a guest failed: the network, or the SSH protocol (the message is
    the transport's own)."""


class GuestAuthenticationError(GuestTransportError):
    """A guest did not accept the lab's key (cloud-init may not have installed it yet)."""


class StageVerificationError(LabbuilderError):
    """An install stage ran, but the guide's verification check did not pass."""
