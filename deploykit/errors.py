"""Errors the CLI maps to exit codes: bad input is 2, a failed quality gate 3, anything else 1."""


class DeployKitError(Exception):
    """An internal failure with a message meant for the user (exit code 1)."""


class InputError(DeployKitError):
    """The user's input is wrong: a recipe, a path, a tampered artifact (exit code 2)."""


class QualityGateError(DeployKitError):
    """The build ran, but a model lost more quality than the recipe accepts (exit code 3); nothing was written."""
