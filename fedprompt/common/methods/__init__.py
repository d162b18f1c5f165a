"""The federated methods' specs (`fedprompt.common.methods.spec`), one module per method; each
name has a client half (`edge_client.methods`) and a server half (`aggregator.strategies`), and a
test checks that both sides register exactly these."""

from __future__ import annotations

from fedprompt.common.methods import afspl, dpfpl, fedmvp, pfedmoap, promptfl, secfpp
from fedprompt.common.methods.spec import MethodSpec, RunSettings, TaskSettings, spec_of

METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (promptfl.SPEC, dpfpl.SPEC, pfedmoap.SPEC, secfpp.SPEC, fedmvp.SPEC, afspl.SPEC)
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_SPECS)

__all__ = ["METHOD_NAMES", "METHOD_SPECS", "MethodSpec", "RunSettings", "TaskSettings", "spec_of"]
