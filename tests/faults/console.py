"""A telnet session with payd's aiomonitor console, as an operator's client would open one."""

from __future__ import annotations

import asyncio
import contextlib
import re

import telnetlib3

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


class ConsoleSession:
    def __init__(
        self, reader: telnetlib3.TelnetReaderUnicode, writer: telnetlib3.TelnetWriterUnicode
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.closed_by_server = False

    async def send(self, line: str, until: str, timeout: float = 10) -> str:
        """Send a line and collect the answer until ``until`` shows (or the server closes)."""
        self.writer.write(line + "\r\n")
        return await self.read_until(until, timeout)

    async def read_until(self, until: str, timeout: float = 10) -> str:
        seen = ""
        deadline = asyncio.get_running_loop().time() + timeout
        while until not in ANSI.sub("", seen) and asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(TimeoutError):
                chunk = await asyncio.wait_for(self.reader.read(65536), 0.5)
                if chunk == "" and self.reader.at_eof():
                    self.closed_by_server = True
                    break
                seen += chunk
        return ANSI.sub("", seen)

    def close(self) -> None:
        self.writer.close()


async def open_console(port: int) -> ConsoleSession:
    reader, writer = await telnetlib3.open_connection(
        "127.0.0.1", port, term="dumb", cols=200, rows=50, connect_minwait=0.2
    )
    return ConsoleSession(reader, writer)


async def logged_in_console(port: int, token: str) -> ConsoleSession:
    session = await open_console(port)
    await session.read_until("control token:")
    await session.send(token, "payd >>>")
    return session
