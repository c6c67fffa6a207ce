"""A tiny agent program for the signal tests: `python agent_script.py URL AGENT_ID MODE`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from ledger.agent import Agent
from ledger.settings import Settings
from ledger.writer import Writer


async def main(url: str, agent_id: str, mode: str) -> None:
    async with Writer.connect(Settings(nats_url=url), producer_id=agent_id) as ledger:
        async with Agent(ledger, agent_id=agent_id, pool="p", heartbeat=0.2, ttl=5.0, handle_signals=True) as agent:
            print("registered", agent.incarnation, flush=True)
            if mode == "exit-races-sigterm":  # the body ends at once; the signal lands during the exit
                os.kill(os.getpid(), signal.SIGTERM)
            elif mode == "sigterm-interrupts-body":
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(30)
            elif mode == "sigterm-and-sigint":
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                await agent.wait_stopped()
            elif mode == "sigterm-during-goodbye":
                goodbye = asyncio.create_task(agent.goodbye("explicit"))
                await asyncio.sleep(0)
                os.kill(os.getpid(), signal.SIGTERM)
                await goodbye
            elif mode == "wait":
                await agent.wait_stopped()
    print("exited cleanly", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
