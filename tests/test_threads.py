"""Several threads explaining one model at once: same maps as one at a time, model left as found."""

import threading

import pytest
import torch

from captum_vit import AGCAM
from captum_vit.attr import METHODS
from helpers import _close, _state, input_for, make, make_timm, one_thread

THREADS, CALLS = 4, 8


def _jobs(arch):
    # Each call its own batch (1-3 images) and its own mixed targets.
    jobs = []
    for t in range(THREADS):
        for c in range(CALLS):
            b = 1 + (t + c) % 3
            jobs.append((input_for(arch, batch=b, seed=100 + 10 * t + c), [(t * 7 + c * 3 + i) % 10 for i in range(b)]))
    return jobs


def _method(name, model):
    if name == "agcam_generic":
        return AGCAM(model, engine="generic")
    return METHODS[name](model)


CASES = [("agcam", arch) for arch in ("plain", "registers", "respost", "hf")] + [
    # 4 x 8 calls each on a 2-core machine: the other methods' cases are left out of the quick loop.
    pytest.param(name, arch, marks=pytest.mark.slow)
    for name in ("agcam_generic", "rollout", "lrp", "gae", "cdam", "raw", "attnlrp")
    for arch in ("plain", "respost", "hf")
    # LRP, CDAM and AttnLRP need the block parts; the post-norm blocks run the patched fallback instead.
    if not (arch == "respost" and name in ("lrp", "cdam", "attnlrp"))
]


@pytest.mark.parametrize("name,arch", CASES)
def test_threads_share_one_model(name, arch):
    model = make(arch)
    before = _state(model)
    x_plain = input_for(arch, batch=2, seed=5)
    with torch.no_grad():
        plain_before = (model(x_plain) if arch != "hf" else model(pixel_values=x_plain).logits).clone()
    method = _method(name, model)
    jobs = _jobs(arch)
    expected = [method.attribute(x, target=t) for x, t in jobs]

    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(THREADS)

    def worker(t):
        barrier.wait()  # start together so that the calls overlap
        try:
            for c in range(CALLS):
                i = t * CALLS + c
                x, tg = jobs[i]
                results[i] = method.attribute(x, target=tg)
        except Exception as e:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    # One intra-op thread per caller, as a threaded server would run: four callers each
    # spinning up an OpenMP pool on a 2-core machine only makes the test slow and its time erratic.
    with one_thread():
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        _close(got, want)
    assert _state(model) == before
    with torch.no_grad():
        plain_after = model(x_plain) if arch != "hf" else model(pixel_values=x_plain).logits
    assert torch.equal(plain_after, plain_before)


def _plain_model(arch):
    # "respost": post-norm blocks, which run the patched fallback; "train": training mode with
    # every dropout and drop-path rate 0 (timm's default), so that outputs are deterministic;
    # "respost_train": both.
    model = make_timm("respost" if arch.startswith("respost") else "plain")
    return model.train() if arch.endswith("train") else model


@pytest.mark.filterwarnings("ignore:.*training mode")
@pytest.mark.parametrize("arch", ["respost", "train", "respost_train"])
def test_explanations_never_change_what_plain_callers_see(arch):
    model = _plain_model(arch)
    before = _state(model)
    methods = [AGCAM(model, engine="generic"), METHODS["rollout"](model), METHODS["gae"](model)]
    xs = [input_for("plain", batch=2, seed=200 + i) for i in range(4)]
    with one_thread():  # the reference under the same intra-op setting as the threads
        with torch.no_grad():
            plain_want = [model(x).clone() for x in xs]
        maps_want = [[m.attribute(x, target=[1, 2]) for x in xs] for m in methods]
        plain_got, maps_got, errors = [], [], []
        done = threading.Event()
        barrier = threading.Barrier(4)

        def plain_caller():
            barrier.wait()
            try:
                for i in range(24):
                    x = xs[i % len(xs)]
                    with torch.set_grad_enabled(i % 2 == 0):
                        plain_got.append((i % len(xs), model(x).detach()))
            except Exception as e:  # noqa: BLE001 - re-raised in the main thread below
                errors.append(e)

        def explainer(j):
            barrier.wait()
            try:
                while not done.is_set():
                    for k, x in enumerate(xs):
                        maps_got.append((j, k, methods[j].attribute(x, target=[1, 2])))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        plain = [threading.Thread(target=plain_caller) for _ in range(2)]
        explainers = [threading.Thread(target=explainer, args=(j,)) for j in (0, 2)]
        for th in plain + explainers:
            th.start()
        for th in plain:
            th.join()
        done.set()
        for th in explainers:
            th.join()
    assert not errors, errors
    assert len(plain_got) == 48 and maps_got
    wrong = [i for i, out in plain_got if not torch.equal(out, plain_want[i])]
    assert not wrong, f"{len(wrong)} of {len(plain_got)} plain calls saw a changed model"
    for j, k, cam in maps_got:
        _close(cam, maps_want[j][k])
    assert _state(model) == before
