"""The LSTM's whole-sequence CPU kernels (``mnn.kernels.cpu_sequence``) and the threads they run on.

Through ``LSTMLayer`` (float32) they must give the reference lines' numbers to float32 rounding;
each sample's numbers must not depend on how the batch is split between threads, nor on whether it
is multiplied in a tile of eight or alone; their tanh must be within one unit in the last place.
"""
import runpy
import threading
from pathlib import Path

import numba
import numpy
import pytest
from threadpoolctl import threadpool_limits

from mnn import backend, kernels
from mnn.kernels import cpu_sequence, threads, vectors
from mnn.layers import LSTMLayer
from test_kernels import assert_close, kernel_calls

TWO_THREADS = pytest.mark.skipif(threads.numpy_openblas() is None,
                                 reason="NumPy's BLAS is not the OpenBLAS of a NumPy wheel: it lends no threads")


@pytest.fixture(autouse=True)
def fused_and_two_threads():
    """The fused kernels, and two OpenBLAS threads, even on one core (OpenBLAS then starts a second)."""
    before = kernels.mode()
    kernels.use("fused")
    with threadpool_limits(limits=2, user_api="blas"):
        yield
    kernels.use(before)


def run_layer(mode, x, state, g, final_grad, bias=True):
    """(output, input gradient, final h, final c, initial h and c gradients, weight gradients...) of a fresh
    LSTMLayer, by the reference lines or the fused kernels (which must be the sequence kernels, both ways)."""
    kernels.use(mode)
    backend.seed(0)
    layer = LSTMLayer(x.shape[2], g.shape[2], bias=bias)
    with kernel_calls() as called:
        y = layer.forward(x, state=state)
        dx = layer.backward(g, final_state_grad=final_grad)
    ran = [name for name in called if name in ("lstm_forward", "lstm_backward")]
    assert ran == ([] if mode == "numpy" else ["lstm_forward", "lstm_backward"]), called
    return (y, dx, *layer.final_state, *layer.state_grad, *(grad.copy() for grad in layer.grads.values()))


def lstm_arrays(rng, batch, length, inputs, hidden):
    x = rng.standard_normal((batch, length, inputs)).astype(numpy.float32)
    g = rng.standard_normal((batch, length, hidden)).astype(numpy.float32)
    state = tuple(rng.standard_normal((batch, hidden)).astype(numpy.float32) for _ in range(2))
    final_grad = tuple(rng.standard_normal((batch, hidden)).astype(numpy.float32) for _ in range(2))
    return x, state, g, final_grad


@pytest.fixture
def no_step_kernels(monkeypatch):
    """The step kernels fail if called: what runs is the sequence kernels."""
    def step_kernel(*args):
        raise AssertionError("a step kernel ran")
    for name in ("lstm_step_forward", "lstm_step_backward"):
        monkeypatch.setattr(kernels.cpu, name, step_kernel)


@TWO_THREADS
@pytest.mark.parametrize("batch, hidden, bias", [(16, 8, True), (17, 9, True), (20, 13, False), (32, 33, True),
                                                 (40, 1, True), (24, 40, True), (5, 12, True), (1, 3, True)])
def test_the_sequence_kernels_give_the_reference_numbers(no_step_kernels, batch, hidden, bias):
    """Batches of whole tiles, with a rest of 1-4 samples, and of fewer than one tile (one part); 4H and H
    whole panels of 32 columns, and with columns left over; a single unit."""
    x, state, g, final_grad = lstm_arrays(numpy.random.default_rng(batch), batch, 6, 5, hidden)
    reference = run_layer("numpy", x, state, g, final_grad, bias)
    fused = run_layer("fused", x, state, g, final_grad, bias)
    names = ["output", "input gradient", "final h", "final c", "initial h gradient", "initial c gradient",
             *(f"gradient {i}" for i in range(len(fused) - 6))]
    for a, b, name in zip(reference, fused, names):
        assert a.dtype == b.dtype == numpy.float32
        assert_close(a, b, numpy.float32, name)


@TWO_THREADS
def test_two_runs_give_the_same_bits():
    """What a resumed run needs: the threads' order of finishing changes nothing."""
    x, state, g, final_grad = lstm_arrays(numpy.random.default_rng(5), 24, 5, 3, 10)
    for a, b in zip(run_layer("fused", x, state, g, final_grad), run_layer("fused", x, state, g, final_grad)):
        numpy.testing.assert_array_equal(a, b)


@TWO_THREADS
def test_the_given_state_and_final_state_gradient_are_left_as_given():
    x, state, g, final_grad = lstm_arrays(numpy.random.default_rng(0), 16, 4, 3, 8)
    copies = [part.copy() for part in (*state, *final_grad)]
    run_layer("fused", x, state, g, final_grad)
    for before, after in zip(copies, (*state, *final_grad)):
        numpy.testing.assert_array_equal(before, after)


def kernel_run(arrays, ranges):
    """The forward and backward sequence kernels over ``ranges`` of the batch, one after the other in this
    thread: (h, c, tanh c, gates, delta, initial h and c gradients)."""
    gates, w_hh, bias, h0, c0, g, final_h, final_c = (a.copy() for a in arrays)
    length, batch, _ = gates.shape
    y, cells, tanh_cells = (numpy.empty((length, batch, w_hh.shape[1]), numpy.float32) for _ in range(3))
    product = cpu_sequence.scratch(batch, w_hh.shape[0])
    for lo, hi in ranges:
        cpu_sequence.lstm_forward_rows(gates, cpu_sequence.panels(w_hh.T), bias, h0, c0, y, cells, tanh_cells,
                                       product, lo, hi)
    delta, dh, carries = numpy.empty_like(gates), numpy.empty_like(h0), numpy.empty((2,) + h0.shape, numpy.float32)
    for lo, hi in ranges:
        cpu_sequence.lstm_backward_rows(g, cpu_sequence.panels(w_hh), gates, cells, tanh_cells, c0, final_h,
                                        final_c, delta, dh, carries, product, lo, hi)
    return y, cells, tanh_cells, gates, delta, final_h, final_c


@pytest.mark.parametrize("batch", [8, 19, 32])
def test_a_sample_gets_the_same_numbers_however_the_batch_is_split(batch):
    rng = numpy.random.default_rng(batch)
    hidden = 7
    arrays = [rng.standard_normal(shape).astype(numpy.float32) for shape in
              [(5, batch, 4 * hidden), (4 * hidden, hidden), (4 * hidden,), (batch, hidden), (batch, hidden),
               (5, batch, hidden), (batch, hidden), (batch, hidden)]]
    whole = kernel_run(arrays, [(0, batch)])
    for ranges in ([(0, 8), (8, batch)], [(k, min(k + 8, batch)) for k in range(0, batch, 8)],
                   [(k, k + 1) for k in range(batch)]):  # the last: every sample alone, none in a tile
        for a, b in zip(whole, kernel_run(arrays, ranges)):
            numpy.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch, threads_at_hand, expected", [
    (32, 2, [(0, 16), (16, 32)]), (20, 2, [(0, 8), (8, 20)]), (17, 2, [(0, 8), (8, 17)]),
    (15, 2, [(0, 15)]), (32, 1, [(0, 32)]), (64, 3, [(0, 16), (16, 40), (40, 64)]), (16, 8, [(0, 8), (8, 16)]),
    (1, 2, [(0, 1)])])
def test_the_batch_is_split_at_whole_tiles_with_eight_samples_a_thread(monkeypatch, batch, threads_at_hand,
                                                                        expected):
    monkeypatch.setattr(threads, "threads_at_hand", lambda: threads_at_hand)
    assert cpu_sequence.parts(batch) == expected


def test_one_thread_at_hand_runs_the_batch_as_one_part(no_step_kernels):
    """The sequence kernels still, in this thread; a sample's bits the same as in two parts is
    ``test_a_sample_gets_the_same_numbers_however_the_batch_is_split``'s (OpenBLAS's own products
    around the recurrence may change their last bits with its thread count)."""
    x, state, g, final_grad = lstm_arrays(numpy.random.default_rng(0), 19, 3, 2, 4)
    with threadpool_limits(1, user_api="blas"):
        assert threads.threads_at_hand() == 1 and cpu_sequence.parts(19) == [(0, 19)]
        for a, b in zip(run_layer("numpy", x, state, g, final_grad), run_layer("fused", x, state, g, final_grad)):
            assert_close(a, b, numpy.float32, "one thread")


@pytest.mark.parametrize("samples, rows, columns", [(8, 5, 32), (19, 33, 70), (3, 1, 1), (16, 256, 1024)])
def test_multiply_is_the_matrix_product(samples, rows, columns):
    """Tiles of 8 samples and the samples left over; whole panels and a part of one; a single row."""
    rng = numpy.random.default_rng(samples)
    states = rng.standard_normal((samples, rows)).astype(numpy.float32)
    matrix = rng.standard_normal((rows, columns)).astype(numpy.float32)
    out = numpy.full((samples, -(-columns // 32) * 32), numpy.nan, numpy.float32)
    cpu_sequence.multiply(cpu_sequence.panels(matrix), states, out, 0, samples)
    expected = states.astype(numpy.float64) @ matrix.astype(numpy.float64)
    bound = rows * numpy.finfo(numpy.float32).eps * (abs(states) @ abs(matrix))  # a sum of float32 products
    assert (abs(out[:, :columns] - expected) <= bound).all()
    assert not out[:, columns:].any()  # the panels' zero columns


def test_the_vector_operations_take_float32_rows_only():
    @numba.njit
    def first_lanes(row):
        out = numpy.zeros(16, numpy.float32)
        vectors.store(out, 0, vectors.fma(vectors.load(row, 0), vectors.splat(row[0]), vectors.zeros()))
        return out
    row = numpy.arange(1, 17, dtype=numpy.float32)
    numpy.testing.assert_array_equal(first_lanes(row), row * row[0])
    with pytest.raises(numba.core.errors.TypingError):
        first_lanes(row.astype(numpy.float64))
    with pytest.raises(numba.core.errors.TypingError):  # a strided row would be read as if contiguous
        first_lanes(numpy.arange(32, dtype=numpy.float32)[::2])

    @numba.njit
    def store_ones(row):
        vectors.store(row, 0, vectors.splat(numpy.float32(1)))
    read_only = numpy.zeros(16, numpy.float32)
    read_only.flags.writeable = False
    with pytest.raises(numba.core.errors.TypingError):
        store_ones(read_only)


def test_tanh_is_within_one_unit_in_the_last_place_of_the_correctly_rounded_value():
    x = numpy.concatenate([numpy.linspace(-12, 12, 2_000_001), numpy.geomspace(1e-38, 1, 20_001),
                           -numpy.geomspace(1e-38, 1, 20_001), [0.0, 8.9999, 9.0, 9.0001, 1e30, -1e30]])
    x = x.astype(numpy.float32)
    exact = numpy.tanh(x.astype(numpy.float64)).astype(numpy.float32)  # correctly rounded (but for rare ties)
    ours = tanh_of(x)
    ulps = numpy.abs(ours.astype(numpy.float64) - exact) / numpy.spacing(numpy.abs(exact))
    assert ulps.max() <= 1, f"{ulps.max()} units in the last place at x = {x[ulps.argmax()]}"


def test_tanh_keeps_nan_and_takes_infinities_to_one():
    ours = tanh_of(numpy.array([numpy.nan, numpy.inf, -numpy.inf, 0.0], dtype=numpy.float32))
    assert numpy.isnan(ours[0]) and ours[1] == 1 and ours[2] == -1 and ours[3] == 0


def test_the_coefficients_are_those_scripts_fit_tanh_fits():
    fit = runpy.run_path(str(Path(__file__).parent.parent / "scripts" / "fit_tanh.py"))["fit"]
    p, q, error = fit()
    numpy.testing.assert_allclose(p, cpu_sequence.TANH_P, rtol=1e-6)
    numpy.testing.assert_allclose(q, cpu_sequence.TANH_Q, rtol=1e-6)
    assert error < 2e-10


def tanh_of(x):
    """The kernels' tanh, through the forward cell: c~ = tanh(a) for a gate block fed ``x``."""
    gates = numpy.zeros((1, 4 * x.size), numpy.float32)
    gates[0, 2 * x.size:3 * x.size] = x
    zeros = numpy.zeros((1, x.size), numpy.float32)
    out = [numpy.empty((1, x.size), numpy.float32) for _ in range(3)]
    cpu_sequence.lstm_cell_rows(gates, numpy.zeros_like(gates), numpy.zeros(4 * x.size, numpy.float32), zeros, *out,
                                0, 1)
    return gates[0, 2 * x.size:3 * x.size]


@TWO_THREADS
def test_parts_run_side_by_side_and_an_exception_in_one_reaches_the_caller():
    seen, both_running = [], threading.Barrier(2, timeout=10)  # each part waits for the other to start

    def part(index):
        both_running.wait()
        seen.append((index, threading.get_ident()))
    threads.run_parts([lambda: part(0), lambda: part(1)])
    assert sorted(index for index, _ in seen) == [0, 1]
    assert seen[0][1] != seen[1][1] and threading.get_ident() in {ident for _, ident in seen}  # the caller's is one
    seen.clear()

    def fails():
        raise ZeroDivisionError("in a part")
    with pytest.raises(ZeroDivisionError, match="in a part"):
        threads.run_parts([lambda: None, fails])
    threads.run_parts([lambda: seen.append(2), lambda: seen.append(3)])  # and the next call runs
    assert sorted(seen) == [2, 3]


def test_more_parts_than_threads_run_one_after_another_in_this_thread():
    """As when another thread lowers OpenBLAS's count between ``parts`` and ``run_parts``."""
    ran, count = [], threads.threads_at_hand() + 1
    threads.run_parts([lambda k=k: ran.append((k, threading.get_ident())) for k in range(count)])
    assert [k for k, _ in ran] == list(range(count))
    assert {ident for _, ident in ran} == {threading.get_ident()}


@TWO_THREADS
def test_the_layer_runs_on_where_the_thread_count_drops_after_the_split(monkeypatch):
    x, state, g, final_grad = lstm_arrays(numpy.random.default_rng(4), 16, 3, 2, 5)
    expected = run_layer("fused", x, state, g, final_grad)
    split = cpu_sequence.parts(16)
    monkeypatch.setattr(cpu_sequence, "parts", lambda batch: split)  # split for two threads, then
    monkeypatch.setattr(threads, "threads_at_hand", lambda: 1)  # one at hand as the parts start
    for a, b in zip(expected, run_layer("fused", x, state, g, final_grad)):
        numpy.testing.assert_array_equal(a, b)


@TWO_THREADS
def test_weights_and_inputs_of_any_layout_and_dtype_take_the_reference_dtypes():
    x, state, g, final_grad = lstm_arrays(numpy.random.default_rng(6), 16, 4, 3, 6)
    x = numpy.asfortranarray(x)  # not contiguous in C order
    results = {}
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        backend.seed(0)
        layer = LSTMLayer(3, 6)
        layer.params["weight_hh"] = layer.params["weight_hh"].astype(numpy.float64)  # a float64 weight
        y = layer.forward(x, state=state)
        dx = layer.backward(g, final_state_grad=final_grad)
        results[mode] = (y, dx, *layer.final_state, *layer.state_grad)
    for a, b in zip(results["numpy"], results["fused"]):
        assert a.dtype == b.dtype
        assert_close(a, b, numpy.float32, "a float64 weight_hh")
