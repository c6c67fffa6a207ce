"""An agent on a secured server, for the kill -9 test: `python secured_agent_script.py URL SEED INBOX AGENT SESSION`.

It connects with its own nkey and inbox prefix (the SDK's Settings learn these on another branch), claims
SESSION, prints "claimed" and waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

import nats

from ledger import events as ev
from ledger.agent import Agent
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer


async def main(url: str, seed: str, inbox: str, agent_id: str, session_id: str) -> None:
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix=inbox, connect_timeout=5, max_reconnect_attempts=2)
    store = EventStore(nc, Settings(nats_url=url))
    await store.start()
    ledger = Writer(store, ev.Producer(id=agent_id, instance=new_id()))
    async with Agent(ledger, agent_id=agent_id, pool="p", heartbeat=0.2, ttl=1.5) as agent:
        await agent.claim(session_id)
        print("claimed", flush=True)
        await asyncio.sleep(120)  # killed long before


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
