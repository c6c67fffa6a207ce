"""`ledger agent`: the reference agent process."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from ledger.writer import Writer
from projections.health import HealthPolicy

from .common import async_command, echo, nats_url_option, settings_from
from .liveness import policy_options


@click.command("agent")
@click.option("--agent-id", required=True, help="Stable logical name of this agent.")
@click.option("--pool", required=True, help="Pool whose sessions this agent runs.")
@click.option("--platform", default="default", show_default=True)
@click.option("--region", default="default", show_default=True)
@click.option("--capacity", default=4, show_default=True, type=click.IntRange(1), help="Sessions it can own at once.")
@click.option("--heartbeat", default=5.0, show_default=True, type=click.FloatRange(0.05),
              help="Seconds between heartbeats.")
@click.option("--ttl", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Lease: with no heartbeat acknowledged for this long the agent fences itself "
                   "(and the liveness monitor may declare it dead).")
@click.option("--self-claim/--no-self-claim", default=True, show_default=True,
              help="Claim the pool's sessions that need an owner itself (it then follows the whole log); "
                   "with --no-self-claim it runs only what a reclaimer (`ledger up` / `ledger consumers`) gives it.")
@click.option("--report-address", "address_template", default=None, metavar="TEMPLATE",
              help="Report each session it gains as running at TEMPLATE, with {agent} and {session} filled in "
                   "(e.g. '{agent}.local:8000'), so the session's routes warm up [default: report nothing].")
@click.option("--report-health", is_flag=True,
              help="Report each route of its sessions that has a health probe healthy, at the probe's period "
                   "(it reads the routes from the log it follows: not with --no-self-claim).")
@click.option("--checkpoint-every", type=click.FloatRange(0.01), default=None, metavar="SECONDS",
              help="Do a unit of pretend work on each session every SECONDS and checkpoint the count "
                   "(`progress=N`); a session gained with a checkpoint resumes from it and says so "
                   "[default: no work, no checkpoints].")
@policy_options
@nats_url_option
@async_command
async def agent_command(agent_id: str, pool: str, platform: str, region: str, capacity: int, heartbeat: float,
                        ttl: float, self_claim: bool, address_template: str | None, report_health: bool,
                        checkpoint_every: float | None, policy: HealthPolicy, nats_url: str) -> None:
    """Run a reference agent: register, heartbeat, claim the pool's sessions, goodbye on SIGTERM.

    It claims sessions of its pool/platform/region that are pending, orphaned,
    or owned by an agent that said goodbye, was declared dead or was replaced,
    up to --capacity (with --no-self-claim: only what a reclaimer gives it).
    SIGTERM or Ctrl-C writes one goodbye and exits 0. --suspect-after and
    --dead-after say which agents it counts as unable to keep a session (give
    it the consumers' values, as `ledger up` prints them).
    """
    if ttl <= heartbeat:
        raise click.BadParameter(f"--ttl ({ttl:g}) must be longer than --heartbeat ({heartbeat:g})", param_hint="--ttl")
    if report_health and not self_claim:
        raise click.BadParameter("needs the routes of the log, which only a self-claiming agent follows",
                                 param_hint="--report-health")
    if address_template is not None:
        from ledgerctl.agent_process import address

        try:
            address(address_template, agent_id, "s")
        except (KeyError, IndexError, ValueError) as e:
            raise click.BadParameter(f"{address_template!r}: only {{agent}} and {{session}} may be filled in ({e})",
                                     param_hint="--report-address") from None

    def say(line: str) -> None:
        echo(f"{datetime.now(UTC).astimezone().strftime('%H:%M:%S.%f')[:-3]} {agent_id}: {line}")

    settings = settings_from(nats_url).for_lease(ttl)  # a frozen server is left well within the lease
    async with Writer.connect(settings, producer_id=agent_id, name=f"ledger-agent-{agent_id}") as ledger:
        from ledgerctl import agent_process

        await agent_process.run(ledger, agent_id=agent_id, pool=pool, platform=platform, region=region,
                                  capacity=capacity, heartbeat=heartbeat, ttl=ttl, say=say, self_claim=self_claim,
                                  policy=policy, address_template=address_template,
                                  report_health=report_health, checkpoint_every=checkpoint_every)
