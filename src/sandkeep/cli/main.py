"""The `sandkeep` command. Subcommands live in their own modules and load lazily (fast start-up)."""

from __future__ import annotations

import importlib
from typing import Any

import click

from sandkeep import __version__

# name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "host": ("sandkeep.cli.host_cmd", "host", "Run the local machine host (Fly Machines API + proxy)."),
    "gateway": ("sandkeep.cli.gateway_cmd", "gateway", "Run the gateway that lives inside a machine."),
    "serve": ("sandkeep.cli.serve_cmd", "serve", "Run sandkeep: API, engine, web UI and the local host."),
    "token": ("sandkeep.cli.token_cmd", "token", "Issue (print), list and revoke API tokens."),
    "db": ("sandkeep.cli.db_cmd", "db", "Database maintenance (migrations)."),
    "instances": ("sandkeep.cli.instances_cmd", "instances", "Manage instances through the API."),
    "admin": ("sandkeep.cli.admin_cmd", "admin", "Admin actions through the API."),
    "demo": ("sandkeep.cli.demo_cmd", "demo", "Run a self-contained recovery demo."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr, _help = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command: Any = getattr(module, attr)
        return command  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="sandkeep")
def cli() -> None:
    """sandkeep keeps one persistent machine per user alive and recovers it when it stops unexpectedly."""


def main() -> None:
    cli(prog_name="sandkeep")


if __name__ == "__main__":
    main()
