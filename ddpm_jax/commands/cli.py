"""What every command line here shares: flags that fail with one `error: ...` line, and `run`,
which starts an entry point with the XLA flags set and prints a UserError without a traceback.

    def main(argv): ...            # may raise errors.UserError
    if __name__ == "__main__":
        cli.run(main, config_default="ddpm")

A --config value is a shipped config by name (`cifar10`, `vdm:runlocal`, `cifar10:h200`) or a .py
file by path (`configs/vdm.py:runlocal`); ddpm_jax.configuration.load_config_file reads both.
"""

from __future__ import annotations

import errno
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections.config_flags import config_flags as ml_collections_flags

from ddpm_jax import configuration, xla_flags
from ddpm_jax.commands import logs
from ddpm_jax.configuration import load_config_file, lookup_field
from ddpm_jax.errors import ConfigError, UserError

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([\w.]+)(?:=.*)?$", re.S)
_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$", re.S)
_FLAG_IN_MESSAGE = re.compile(r"flag --(?:no)?config\.([\w.]+)=")


def check_config_flags(argv: list[str], default_spec: str) -> ml_collections.ConfigDict:
    """Loads the --config file named in argv and checks that every --config.* override exists."""
    spec, args = default_spec, argv[1:]
    for i, arg in enumerate(args):
        m = _CONFIG_FLAG.match(arg)
        if m:
            spec = m.group(1) if m.group(1) is not None else (args[i + 1] if i + 1 < len(args) else default_spec)
    config = load_config_file(spec)
    from ddpm_jax.training.validation import unread_field_error  # the methods: imported only to check

    for arg in args:
        m = _OVERRIDE.match(arg)
        if m:
            error = unread_field_error(config, m.group(1), fields=False)  # a field the method would silently ignore
            if error is not None:
                raise error
            lookup_field(config, m.group(1))
    return config


def _explain_flag_error(message: str, config: ml_collections.ConfigDict | None) -> str:
    """absl's message, plus the type a --config.* field expects or the help of a plain flag."""
    m = _FLAG_IN_MESSAGE.search(message)
    if m and config is not None:
        try:
            value = lookup_field(config, m.group(1))
        except ConfigError:
            return message
        return (
            f"{message}. config.{m.group(1)} holds a value of type {type(value).__name__} (default {value!r}); "
            "pass one of that type."
        )
    m = re.search(r"of field config\.([\w.]+) is not supported for overriding", message)
    if m:
        tfds_hint = (
            " (for data_dir, the TFDS_DATA_DIR environment variable works too)" if m.group(1) == "data.data_dir" else ""
        )
        return (
            f"--config.{m.group(1)} cannot be set from the command line: its default is None, whose type "
            "ml_collections cannot override. Give it a typed default in the config file, e.g. "
            f"ml_collections.config_dict.placeholder(str){tfds_hint}."
        )
    m = re.search(r"flag --(\w+)=", message)
    if m and m.group(1) in flags.FLAGS:
        flag = flags.FLAGS[m.group(1)]
        return f"{message}. --{flag.name}: {flag.help.rstrip('.')} (default {flag.default!r})."
    return message


def flags_parser(config_default: str | None = None):
    """An absl `flags_parser` for app.run that prints `error: ...` (no traceback) for bad flags.

    Args:
      config_default: the --config default (`name_or_path[:variant]`), for entry points with a --config flag;
        its overrides are checked against the loaded config before absl parses them.
    """

    def parse(argv):
        config = None
        try:
            if config_default is not None:
                config = check_config_flags(argv, config_default)
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(f"error: {_explain_flag_error(str(e), config)}")
        except UserError as e:
            sys.exit(f"error: {e}")
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # ml_collections' own, last resort
            sys.exit(
                f"error: bad command line {' '.join(argv[1:])!r} ({type(e).__name__}: {e}). "
                "Check the --config.* names against the config file."
            )

    return parse


class _ConfigParser(flags.ArgumentParser):
    """The --config parser: `name_or_path[:variant]` read by load_config_file, the config locked."""

    def parse(self, argument):
        config = load_config_file(argument)
        config.lock()
        return config

    def flag_type(self):
        return "config object"


CONFIG_HELP = (
    "A config by name ({names}) or a .py file, optionally with :variant (e.g. vdm:runlocal, cifar10:h200); "
    "override any field with --config.<section>.<field>=value."
)


def define_config_flag(default_spec: str, help_text: str | None = None):
    """`--config` (ml_collections' config flag, locked) that takes a shipped config's name or a file's
    path, with every --config.* override checked first.

    ml_collections applies the overrides already when the flag is defined (at import of the entry
    point), where an unknown field would end in a traceback; this says `error: ...` instead.
    """
    try:
        check_config_flags(sys.argv, default_spec)
        help_text = help_text or CONFIG_HELP.format(names=", ".join(configuration.names()))
        flag = ml_collections_flags._ConfigFlag(  # DEFINE_config_file's flag, with the parser that knows names
            parser=_ConfigParser(),
            serializer=flags.ArgumentSerializer(),
            name="config",
            default=default_spec,
            help_string=help_text,
            flag_values=flags.FLAGS,
        )
        return flags.DEFINE_flag(flag, flags.FLAGS)
    except UserError as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        sys.exit(f"error: {_explain_flag_error(str(e), None)}. Check the --config.* names against the config file.")


def _list_in_help(main) -> None:
    """`--help` lists the flags of sys.argv[0]'s module; a command's flags are defined in its own module
    (ddpm_jax.commands.train, ddpm_jax.commands.evaluate, ...), so they are listed as that script's too."""
    command_flags = list(flags.FLAGS.flags_by_module_dict().get(main.__module__, []))
    if "config" in flags.FLAGS:
        command_flags.append(flags.FLAGS["config"])
    if "log_level" in flags.FLAGS:
        command_flags.append(flags.FLAGS["log_level"])
    for flag in command_flags:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main, config_default: str | None = None) -> None:
    """app.run(main) with the XLA:CPU flags set first and `flags_parser(config_default)`; a UserError
    (or ValueError, or an OSError of a full disk) from main exits with `error: <message>` and status 1.

    The console is quiet (ddpm_jax.commands.logs): --log_level=quiet|info|debug says whether the
    libraries' INFO lines show; a command with a workdir sends them to <workdir>/log.txt."""

    def checked_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logs.start(flags.FLAGS.log_level)  # after app.run has put absl's handler on the root logger
        try:
            return main(argv)
        except (UserError, ValueError) as e:
            sys.exit(f"error: {e}")
        except OSError as e:  # a full disk where no layer below said more (sample.py's and evaluate's outputs)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            sys.exit(
                f"error: no space left{f' for {e.filename}' if e.filename else ''} ({e.strerror}): free space "
                "there, or write elsewhere."
            )
        finally:
            logs.stop()  # closes <workdir>/log.txt (copies a remote one)

    logs.define_flag()
    logs.quiet_native_logs(logs.level_in_argv(sys.argv))  # before TensorFlow or jaxlib loads
    xla_flags.configure()  # before anything creates a JAX backend
    _list_in_help(main)
    app.run(checked_main, flags_parser=flags_parser(config_default))
