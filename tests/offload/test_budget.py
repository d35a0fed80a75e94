"""The RAM budget: parsing --ram, resolving it against a (fake) machine, and plans."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from flashlm.errors import BudgetError, InputError
from flashlm.models.config import ModelConfig
from flashlm.offload.budget import (MIN_CTX, MIN_PREFILL, MiB, Layout, activation_bytes, kv_bytes, make_plan, parse_ram, parse_size,
                                    resolve_budget, spread)

GiB = 1 << 30


def test_parse_sizes():
    assert parse_size("512M") == 512 * MiB
    assert parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("4g") == 4 * GiB
    assert parse_size("1e9") == 10**9
    assert parse_size("2048") == 2048
    assert parse_size(12345) == 12345
    for bad in ("infG", "nanM", "-1G", "lots", "", "0", "1e400", "12Q"):
        with pytest.raises(InputError, match="size"):
            parse_size(bad)


def test_parse_ram_kinds():
    assert parse_ram(None).kind == parse_ram("auto").kind == parse_ram(" AUTO ").kind == "auto"
    r = parse_ram("60%")
    assert (r.kind, r.value) == ("percent", 60.0)
    assert parse_ram("560M").value == 560 * MiB
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(InputError, match="between 0% and 100%"):
            parse_ram(bad)


def vm(total=24 * GiB, available=20 * GiB):
    return SimpleNamespace(total=total, available=available)


def test_resolve_budget():
    assert resolve_budget(parse_ram("1G"), vm=vm(), rss=0, cgroup=None) == GiB
    assert resolve_budget(parse_ram("50%"), vm=vm(total=8 * GiB), rss=0, cgroup=None) == 4 * GiB
    # auto: what this process holds + what is available - max(256 MiB, 5% of RAM)
    auto = resolve_budget(parse_ram("auto"), vm=vm(total=8 * GiB, available=2 * GiB), rss=300 * MiB, cgroup=None)
    assert auto == 300 * MiB + 2 * GiB - int(0.05 * 8 * GiB)
    small = resolve_budget(parse_ram("auto"), vm=vm(total=2 * GiB, available=GiB), rss=0, cgroup=None)
    assert small == GiB - 256 * MiB
    # a memory cgroup limit is what counts when it is tighter than the machine
    cg = (600 * MiB, 200 * MiB)  # limit, usage
    assert resolve_budget(parse_ram("auto"), vm=vm(), rss=200 * MiB, cgroup=cg) == 200 * MiB + 400 * MiB - 256 * MiB
    assert resolve_budget(parse_ram("50%"), vm=vm(), rss=0, cgroup=cg) == 300 * MiB


CFG = ModelConfig(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
# the 1.5B's store: 28 layers of ~28.6 MiB, a 182.6 MiB Q6_K head, a 125 MiB embedding
LAYOUT = Layout(layer_bytes=(30007296,) * 28, small_bytes=28 * 5 * 8192, head_name="output.weight",
                head_bytes=191439360, head_rows=151936, head_row_bytes=1260, embed_bytes=131272704, tied=False,
                store_bytes=28 * 30007296 + 191451136 + 131272704 + 16384, n_layers=28)
BASE = 190 * MiB


def plan(budget, **kw):
    return make_plan(LAYOUT, CFG, budget=budget, baseline=BASE, **kw)


def test_everything_fits_in_ram():
    p = plan(4 * GiB)
    assert not p.streams and p.ctx == 4096 and p.resident_bytes == LAYOUT.store_bytes
    assert p.prefill_rows == 512 and "fits in RAM" in p.summary()


def test_plans_at_several_budgets_stream_less_with_more_ram():
    last = None
    for mb in (300, 450, 600, 800, 1000, 1200):
        p = plan(mb * MiB, ctx=512)
        assert p.streams
        assert p.planned_bytes <= p.budget, mb
        assert p.n_slots == 2 and p.slot_bytes >= max(LAYOUT.layer_bytes)
        assert p.resident_bytes + p.streamed_bytes_per_token == sum(LAYOUT.layer_bytes) + LAYOUT.head_bytes
        if last is not None:
            assert p.streamed_bytes_per_token <= last.streamed_bytes_per_token
            assert len(p.resident_layers) + p.head_resident >= len(last.resident_layers) + last.head_resident - 1
        last = p
    assert last.head_resident and len(last.resident_layers) > 10


def test_resident_layers_are_spread_evenly():
    p = plan(700 * MiB, ctx=512)
    r = p.resident_layers
    assert len(r) >= 2 and r == tuple(sorted(r))
    gaps = [b - a for a, b in zip(r, r[1:])]
    assert max(gaps) - min(gaps) <= 1
    assert spread(28, 4) == (3, 10, 17, 24) and spread(5, 9) == tuple(range(5)) and spread(5, 0) == ()


def test_the_minimum_is_an_error_that_names_it():
    with pytest.raises(BudgetError, match=r"needs at least (\d+) MiB") as e:
        plan(250 * MiB, ctx=512)
    need = int(e.value.args[0].split("needs at least ")[1].split(" MiB")[0])
    assert 250 < need < 320
    p = plan((need + 1) * MiB, ctx=512)  # one MiB over the minimum is a plan
    assert p.streams and p.resident_layers == ()


def test_ctx_is_lowered_only_when_not_given():
    p = plan(330 * MiB)
    assert p.streams and p.ctx < 4096 and any("a longer context would take RAM" in n for n in p.notes)
    with pytest.raises(BudgetError, match="lower --ctx"):
        plan(330 * MiB, ctx=4096)
    assert plan(330 * MiB, ctx=MIN_CTX).ctx == MIN_CTX


def test_prefill_steps_shrink_before_giving_up():
    roomy, tight = plan(3 * GiB, ctx=512, force_stream=True), plan(300 * MiB, ctx=512)
    assert roomy.prefill_rows == 512 and roomy.streamed_bytes_per_token == 0
    assert tight.prefill_rows < 512 and any("prefill in steps" in n for n in tight.notes)
    # in between, the step is the one with which a 512-token prompt + 32 steps read the least
    mid = plan(800 * MiB, ctx=512)
    assert MIN_PREFILL <= mid.prefill_rows <= 512 and mid.planned_bytes <= mid.budget


def test_batch_and_draft_count():
    one, eight = plan(700 * MiB, ctx=512), plan(700 * MiB, ctx=512, batch=8, draft=4)
    assert eight.kv_bytes == 8 * one.kv_bytes == 8 * kv_bytes(CFG, 512)
    assert eight.act_bytes > one.act_bytes
    assert eight.streamed_bytes_per_token >= one.streamed_bytes_per_token
    with pytest.raises(InputError):
        plan(GiB, batch=0)


def test_f16_kv_cache_is_counted_at_half_the_bytes():
    f32, f16 = plan(4 * GiB, ctx=4096), plan(4 * GiB, ctx=4096, kv="f16")
    assert f32.kv == "f32" and f16.kv == "f16" and f16.as_dict()["kv"] == "f16"
    assert f16.kv_bytes * 2 == f32.kv_bytes == kv_bytes(CFG, 4096)
    assert f16.kv_bytes == kv_bytes(CFG, 4096, 1, "f16") == 2 * 28 * 2 * 4096 * 128 * 2
    assert f16.planned_bytes == f32.planned_bytes - f16.kv_bytes
    # streaming, with ctx chosen by the planner: the KV cache's share of the budget allows a
    # longer context at 2 bytes per element, and what it does not take goes to resident weights
    s32, s16 = plan(600 * MiB), plan(600 * MiB, kv="f16")
    assert s16.streams and s32.streams and s16.kv_bytes == kv_bytes(CFG, s16.ctx, 1, "f16")
    assert s16.ctx >= s32.ctx and s16.planned_bytes <= s16.budget
    with pytest.raises(InputError, match="--kv 'f8' is invalid"):
        plan(4 * GiB, kv="f8")


def test_activation_estimate_covers_blas_tiles():
    small, big = activation_bytes(CFG, 63), activation_bytes(CFG, 64)
    assert big - small > 30 * MiB  # the f32 tile of 1024 x 8960 weights
    assert activation_bytes(CFG, 1) < 4 * MiB


def test_force_stream_and_layout_of_a_store(tiny_store):
    layout = Layout.of(tiny_store)
    assert layout.n_layers == tiny_store.n_layers and layout.store_bytes == tiny_store.nbytes
    assert layout.head_name == "output.weight" and layout.head_rows == tiny_store.config.vocab_size
    p = make_plan(layout, tiny_store.config, budget=8 * GiB, baseline=BASE, force_stream=True)
    assert p.streams and p.head_resident and len(p.resident_layers) == layout.n_layers
