"""Cost of one secure-aggregation session in one process: `python -m fedprompt.common.secagg.bench`.

For each setting it runs the whole protocol (real X25519, AES-GCM, AES-CTR, Shamir, Ed25519
signatures of the keys and of the survivor list; every message serialised) over random 16 x 512
prompt updates, checks that the unmasked sum is exact, and prints compute time per client and for
the server and the bytes each client sends and receives.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.loopback import SERVER, DropStage, run_loopback
from fedprompt.common.secagg.policy import ThresholdFloor
from fedprompt.common.secagg.quantize import Quantizer


@dataclass(frozen=True)
class Setting:
    clients: int
    degree: int | None
    dropped_before_upload: int

    @property
    def threshold(self) -> int:
        """The devices' default floor: a majority of each neighbourhood, the client included."""
        neighbours = self.clients - 1 if self.degree is None else self.degree
        return ThresholdFloor().lowest(neighbours + 1)


DEFAULT_SETTINGS = (
    Setting(10, None, 0),
    Setting(10, None, 2),
    Setting(50, None, 0),
    Setting(50, None, 5),
    Setting(50, 10, 0),
    Setting(50, 10, 5),
)


def run_setting(setting: Setting, length: int) -> dict[str, float]:
    config = SecAggConfig(vector_length=length, threshold=setting.threshold, degree=setting.degree)
    quantizer = Quantizer(bound=1.0, max_clients=setting.clients, modulus_bits=config.modulus_bits)
    rng = np.random.default_rng(0)
    inputs = {i: quantizer.encode(rng.normal(0.0, 0.1, length), rng) for i in range(setting.clients)}
    step = setting.clients // max(setting.dropped_before_upload, 1)
    dropouts = {i * step: DropStage.BEFORE_UPLOAD for i in range(setting.dropped_before_upload)}
    start = perf_counter()
    run = run_loopback(config, inputs, b"bench", dropouts)
    wall = perf_counter() - start
    expected = sum(inputs[i] for i in run.result.survivors) % np.uint64(config.modulus.value)
    if not np.array_equal(run.result.field_sum, expected):
        raise AssertionError("the unmasked sum differs from the plain sum")
    survivors = run.result.survivors
    return {
        "client_ms": 1e3 * np.mean([run.seconds[i] for i in survivors]),
        "server_ms": 1e3 * run.seconds[SERVER],
        "up_kib": np.mean([run.bytes_up[i] for i in survivors]) / 1024,
        "down_kib": np.mean([run.bytes_down[i] for i in survivors]) / 1024,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16 * 512, help="vector length (default 16 x 512)")
    args = parser.parse_args(argv)
    plain_kib = args.length * 4 / 1024
    print(f"secure aggregation of {args.length} float32 values ({plain_kib:.0f} KiB plain), modulus 2**32")
    print(
        f"{'clients':>7} {'graph':>9} {'t':>3} {'dropped':>7} {'client ms':>9} {'server ms':>9} "
        f"{'up KiB':>7} {'down KiB':>8} {'wall s':>6}"
    )
    for setting in DEFAULT_SETTINGS:
        figures = run_setting(setting, args.length)
        graph = "complete" if setting.degree is None else f"k={setting.degree}"
        print(
            f"{setting.clients:>7} {graph:>9} {setting.threshold:>3} {setting.dropped_before_upload:>7} "
            f"{figures['client_ms']:>9.1f} {figures['server_ms']:>9.1f} {figures['up_kib']:>7.1f} "
            f"{figures['down_kib']:>8.1f} {figures['wall_s']:>6.2f}"
        )
    print(
        "client ms: mean compute per surviving client (keys, signatures, shares, masks, unmasking, parsing);"
    )
    print("server ms: all server compute; dropped: clients gone after sharing keys, before uploading.")


if __name__ == "__main__":
    main()
