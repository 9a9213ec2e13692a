"""`python -m ddpm_jax.evaluate` and `from ddpm_jax import evaluate`: the ddpm-evaluate command, which lives in
ddpm_jax.commands.evaluate (this name is kept so documented commands and imports keep working)."""

from ddpm_jax.commands import evaluate as _command


def __getattr__(name):
    return getattr(_command, name)


if __name__ == "__main__":
    __doc__ = _command.__doc__  # absl's --help shows the __main__ module's docstring: the command's
    _command.cli_main()
