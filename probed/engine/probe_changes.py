"""Changes to the probe table, each applied while the guest is stopped: adding breakpoint, return and watch
probes (spec checks, handlers, filters, names), removing, enabling, disabling, and relocating them with their
symbol file. `engine.probe_changes`; the engine's public API (`add_probe`, `remove_probe`...) delegates here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from probed.engine.probes import Probe
from probed.engine.returns import checked_maxactive, default_maxactive
from probed.engine.state import Guest
from probed.errors import BadSpec, NotFound, TargetError
from probed.guest.insn import verify_boundary
from probed.guest.symbols import Location
from probed.guest.userfile import is_user_spec
from probed.lang.handlers import Handler, make_handlers

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = ["ProbeChanges"]


class ProbeChanges:
    """Adds, removes, enables, disables and relocates the engine's probes (see the module's docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def _check_readable(self, address: int) -> None:
        engine = self.engine
        (result,) = await engine.target.read_many([(address, 1)])
        if isinstance(result, Exception):
            raise TargetError(f"address {address:#x} is not mapped in the guest (the target refused to read it: {result})")

    def new_name(self, name: str | None, fallback: str) -> str:
        """A probe's name: `name` if free (else BadSpec), or `fallback` made unique."""
        engine = self.engine
        if name:
            if engine.table.name_taken(name):
                raise BadSpec(name, "a probe with that name exists already")
            return name
        base = fallback.replace(":", "_").replace("+", "_")
        candidate, n = base, 1
        while engine.table.name_taken(candidate):
            n += 1
            candidate = f"{base}_{n}"
        return candidate

    def make_condition(self, condition: str | None, pre: Handler | None, post: Handler | None):
        """The filter of a probe over its handlers' fields (None without a condition)."""
        if not condition:
            return None
        from probed.lang.filter import parse_filter

        fields: list[str] = []
        for h in (pre, post):
            fields += list(getattr(h, "fields", ()) or ())
        return parse_filter(condition, fields)

    async def add_probe(
        self,
        spec: str,
        *,
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        hw: bool = False,
        internal: bool = False,
        file_copy: str | None = None,
        file_offset: int | None = None,
        retprobe: bool = False,
        maxactive: int = 0,
        timeout: float | None = None,
    ) -> Probe:
        """`Engine.add_probe` (its docstring says what each argument means): check the spec and the options,
        make the handlers and the filter, install the probe (or keep it pending, or hand a user probe to
        `engine.uprobes`).

        Raises:
            UnknownSymbol, BadSpec, FetchSyntaxError, FilterSyntaxError, SlotsExhausted, TargetError.
        """
        engine = self.engine
        self._require_attached()
        if is_user_spec(spec):
            if hw:
                raise BadSpec(spec, "user probes use software breakpoints (--hw is for kernel code)")
            return await engine.uprobes.add(spec, file_copy=file_copy, name=name, pre=pre, post=post,
                                            condition=condition, priority=priority, ret=retprobe,
                                            file_offset=file_offset, maxactive=maxactive,
                                            timeout=_timeout(timeout))
        if file_copy is not None or file_offset is not None:
            raise BadSpec(spec, "a file copy or offset is for user probes (/PATH:SYMBOL)")
        location, pending = self._resolve_or_pending(spec)
        if pending and hw:
            raise BadSpec(spec, "a hardware probe needs its module loaded (its slot is taken when it is set)")
        maxactive = checked_maxactive(spec, retprobe=retprobe, offset=location.offset, post=post, maxactive=maxactive,
                                      default=default_maxactive(len(engine.target.threads)))
        pre_h, post_h = await make_handlers([pre, post], engine.arch, engine.symbols, function=location.symbol,
                                            offset=location.offset, load_types=engine.kernel_types,
                                            retprobe=retprobe)
        cond = self.make_condition(condition, pre_h, post_h)

        return await self._add(
            location, spec, name, pre=pre_h, post=post_h, condition=cond, priority=priority, hw=hw,
            retprobe=retprobe, maxactive=maxactive, pending=pending, internal=internal,
            timeout=_timeout(timeout),
        )

    def _resolve_or_pending(self, spec: str) -> tuple[Location, str | None]:
        """The spec's location, or for `MOD:SYM+off` of a module not loaded yet (when the guest model knows
        modules), a location without an address and why it waits."""
        engine = self.engine
        try:
            return engine.symbols.resolve(spec), None
        except NotFound:
            modules = getattr(engine.linux, "modules", None)
            waiting = modules.pending_location(spec) if modules is not None else None
            if waiting is None:
                raise
            return waiting

    async def add_watch(
        self,
        spec: str,
        *,
        length: int | None = None,
        access: str = "w",
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> Probe:
        """Add a data watchpoint probe on a data symbol or `0xADDR` (see `probed.engine.watch`); `timeout` as
        in `add_probe`."""
        engine = self.engine
        self._require_attached()
        location, length, access = engine.watch.check(spec, length, access)
        pre_h, post_h = await make_handlers([pre, post], engine.arch, engine.symbols, load_types=engine.kernel_types)
        cond = self.make_condition(condition, pre_h, post_h)

        return await self._add(
            location, spec, name, kind="watch", pre=pre_h, post=post_h, condition=cond, priority=priority,
            length=length, access=access, timeout=_timeout(timeout),
        )

    async def _add(self, location: Location, spec: str, name: str | None, **fields: Any) -> Probe:
        """Create and install a probe while the guest is stopped."""
        engine = self.engine

        async def apply() -> Probe:
            if not fields.get("pending"):
                await self._check_readable(location.address)
                if fields.get("kind") != "watch":  # kprobes' rule: a probe starts an instruction
                    await verify_boundary(engine.target.read_many, engine.arch.name, spec, location.symbol,
                                          location.offset, location.address)
            probe = Probe(
                id=engine.table.new_id(internal=bool(fields.get("internal"))),
                name=self.new_name(name, location.symbol and _short(location) or f"{location.address:#x}"),
                spec=spec,
                location=location,
                **fields,
            )
            if probe.kind == "watch":
                probe.last_value = await engine.watch.current_value(probe)
            if probe.pending:
                engine.table.add(probe)  # installed when its module loads
                return probe
            await engine.breakpoints.install(probe)
            return probe

        return await engine.call_stopped(apply)

    async def remove_probe(self, ref: int | str) -> None:
        """Remove a probe; its hook point stays while other probes hang on it.

        Raises:
            NotFound: no such probe.
        """
        engine = self.engine
        engine.table.find(ref)

        async def apply() -> None:
            probe = engine.table.find(ref)
            engine.table.remove(probe)
            engine.returns.forget(probe)
            await engine.breakpoints.reconcile()

        await engine.call_stopped(apply)

    async def remove_all(self) -> int:
        """Remove every probe; returns how many there were."""
        engine = self.engine

        async def apply() -> int:
            probes = [p for p in engine.table if not p.internal]
            for p in probes:
                engine.table.remove(p)
                engine.returns.forget(p)
            await engine.breakpoints.reconcile()
            return len(probes)

        return await engine.call_stopped(apply)

    async def enable_probe(self, ref: int | str) -> None:
        """Enable a probe (its breakpoint is installed again, and it takes a slot if it needs one)."""
        engine = self.engine
        engine.table.find(ref)

        async def apply() -> None:
            probe = engine.table.find(ref)
            if probe.enabled:
                return
            if probe.pending:
                probe.enabled, probe.disabled_reason = True, None
                return
            breakpoints = engine.breakpoints
            point = engine.table.points[probe.point_key]
            breakpoints.take_slot(probe)
            probe.enabled, probe.disabled_reason, probe.fault_run = True, None, 0
            if probe.kind == "watch":
                probe.last_value = await engine.watch.current_value(probe)
            for key, exc in await breakpoints.reconcile():
                if key == point.key:
                    probe.enabled = False
                    breakpoints.give_back(key)
                    raise exc

        await engine.call_stopped(apply)

    async def disable_probe(self, ref: int | str) -> None:
        """Disable a probe: its breakpoint goes when no enabled probe shares it (and frees its slot)."""
        engine = self.engine
        engine.table.find(ref)

        async def apply() -> None:
            probe = engine.table.find(ref)
            probe.enabled = False
            probe.disabled_reason = None
            engine.returns.forget(probe)
            await engine.breakpoints.reconcile()

        await engine.call_stopped(apply)

    async def set_bias(self, file: str, bias: int) -> list[Probe]:
        """Relocate a symbol file; its probes move with it. Returns the probes that moved."""
        engine = self.engine

        async def apply() -> list[Probe]:
            engine.symbols.set_bias(file, bias)
            moved = [p for p in engine.table if p.location.file == file]
            for p in moved:
                engine.table.remove(p)
                engine.returns.forget(p)
                p.location = engine.symbols.relocate(p.location)
                engine.table.add(p)
            await engine.breakpoints.reconcile()
            return moved

        return await engine.call_stopped(apply)

    def _require_attached(self) -> None:
        engine = self.engine
        if engine.target is None or engine.arch is None:
            raise TargetError("the engine is not attached to a target yet")
        if engine.service.dead is not None:
            raise TargetError("the engine has stopped")
        if engine.guest.state is Guest.WAITING:
            raise TargetError(f"the target is not connected ({engine.service.lost_reason}); probed is waiting for it")
        reboot = engine.reboot
        if reboot is not None and (reboot.waiting or reboot.error is not None):
            # The symbols are the old kernel's: a probe added now would be placed at its addresses.
            raise TargetError(f"the guest rebooted and its kernel is not placed: {reboot.status()['reboot']}; "
                              "try again once it is (probectl status)")


def _timeout(seconds: float | None) -> float | None:
    """A handler time limit as given (None: the engine's default), checked."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0 or seconds != seconds:
        raise BadSpec(str(seconds), "a handler time limit is a number of seconds >= 0 (0: no limit)")
    return float(seconds)


def _short(location: Location) -> str:
    return location.symbol if not location.offset else f"{location.symbol}+{location.offset:#x}"
