"""The `ledger` command line."""

from __future__ import annotations

import click

from ledger import __version__

from .agent import agent_command
from .auth import auth_group
from .check import check_command
from .common import LOG_FORMATS, LedgerGroup, setup_logging
from .consumers import consumers_command, pool_group
from .demo import demo_command
from .doctor import doctor_command
from .drain import drain_command
from .entities import route_group, session_group, unreachable_command
from .export import export_command, import_command
from .project import PROJECTOR_COMMANDS
from .query_service import query_service_command
from .replay import replay_command
from .schema import schema_command
from .server import init_command, server_command
from .up import up_command
from .views import VIEW_COMMANDS
from .whatif import whatif_command
from .why import why_command


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ledger")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              envvar="LEDGER_LOG_FORMAT", show_envvar=True,
              help="Log records on stderr: text, or one JSON object a line (time, level, logger, message).")
def cli(verbose: int, log_format: str) -> None:
    """Session ledger: who owns what in a fleet that fails, as an event log on NATS JetStream.

    Start with `ledger up` (an embedded JetStream server on loopback, the
    projector and the consumers) or `ledger demo` (the same, plus a small
    fleet that fails); every other command talks to it through --nats-url /
    LEDGER_NATS_URL and reads the projection file through --db / LEDGER_DB.
    """
    setup_logging(verbose, log_format)


for command in (auth_group, up_command, demo_command, doctor_command, check_command, server_command, init_command,
                agent_command, session_group, route_group, unreachable_command, replay_command, consumers_command,
                pool_group, drain_command, schema_command, *VIEW_COMMANDS, *PROJECTOR_COMMANDS,
                query_service_command, why_command, whatif_command, export_command, import_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="ledger")
