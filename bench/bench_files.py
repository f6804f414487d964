"""Files: what a ``save_blob``/``upload`` call costs its caller, inline (in the frame) and through
the spool or by path, at sizes around ``FILE_INLINE_MAX_BYTES``; and the raw costs behind the line
(pack and send the bytes, against create and write a spool file). One JSON line per case."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench._util import Agent, emit


def _median_us(samples: list[int]) -> float:
    return round(statistics.median(samples) / 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    calls = 20 if args.quick else args.calls
    with Agent("--merge-window-s", "0.2") as agent:
        os.environ.update(agent.env)
        import dashcar

        exp = dashcar.Experiment(prefix="bench/files/run", dash_root=agent.data_dir, echo_logs=False).start()
        work = tempfile.mkdtemp(prefix="dcbf-")
        for size in (1 << 10, 16 << 10, 64 << 10, (64 << 10) + 1, 1 << 20, 4 << 20):
            data = os.urandom(size)
            path = os.path.join(work, f"f{size}.bin")
            with open(path, "wb") as f:
                f.write(data)
            builder = exp.files("bench")
            save, upload = [], []
            for i in range(calls):
                t = time.perf_counter_ns()
                builder.save_blob(data, to=f"s{size}-{i}.bin")
                save.append(time.perf_counter_ns() - t)
                t = time.perf_counter_ns()
                builder.upload(path, to=f"u{size}-{i}.bin")
                upload.append(time.perf_counter_ns() - t)
                if i % 20 == 19:
                    exp.flush(30)
            emit("files_call", {"size_bytes": size, "inline": size <= dashcar.proto.FILE_INLINE_MAX_BYTES,
                                "save_blob_p50_us": _median_us(save), "upload_p50_us": _median_us(upload)})
        raw_send, raw_spool = [], []
        data = os.urandom(64 << 10)
        spool = os.path.join(work, "spool")
        os.makedirs(spool)
        producer = exp._live_transport().producer()
        for i in range(calls):
            t = time.perf_counter_ns()
            producer.send(dashcar.proto.Kind.FILE_PUT, str(exp.dash_root), exp.prefix,
                          [str(i), "/raw", "r.bin", ["inline", data], {"time": 0.0}])
            raw_send.append(time.perf_counter_ns() - t)
            t = time.perf_counter_ns()
            with open(os.path.join(spool, str(i)), "xb") as f:
                f.write(data)
            raw_spool.append(time.perf_counter_ns() - t)
        emit("files_raw_64k", {"pack_and_send_p50_us": _median_us(raw_send), "spool_write_p50_us": _median_us(raw_spool)})
        exp.complete()


if __name__ == "__main__":
    main()
