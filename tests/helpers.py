"""Assertion helpers with named tolerances for end-to-end results, and a TFLite graph reader."""

import numpy as np

# Named tolerances (see docs/design.md for why each is what it is).
SIMULATION_GAP_STEPS = 1.0 + 1e-3   # Keras fake-quant vs TFLite: at most one output step
TWIN_ATOL = 1e-4                    # folded float twin vs original model


def assert_quantized(result, *, per_channel=True, fully_int8=True, max_gap_steps=SIMULATION_GAP_STEPS,
                     min_sqnr_db=None, max_accuracy_drop=None):
    """Checks a PTQResult: int8 ops, weight scales, simulation gap, accuracy."""
    insp = result.inspection
    if fully_int8:
        assert insp.fully_quantized, f"float ops left: {insp.float_ops}"
        assert insp.weights, "no Conv/Depthwise/FullyConnected weights found"
        assert all(w.dtype == "int8" for w in insp.weights), insp.weights
    if per_channel:
        assert insp.all_weights_per_channel, [w for w in insp.weights if not w.per_channel]
    if max_gap_steps is not None and "simulated vs TFLite" in result.comparisons:
        gap = result.comparisons["simulated vs TFLite"].max_error_steps
        assert gap is not None and gap <= max_gap_steps, f"simulation gap {gap} output steps"
    main = result.comparisons["float vs TFLite"]
    if min_sqnr_db is not None:
        assert main.sqnr_db >= min_sqnr_db, f"SQNR {main.sqnr_db:.2f} dB < {min_sqnr_db}"
    if max_accuracy_drop is not None:
        assert main.accuracy_drop is not None, "no labels given"
        assert main.accuracy_drop <= max_accuracy_drop, f"accuracy drop {main.accuracy_drop:.2f} points"


def random_inputs(model, n, seed=0, low=-1.0, high=1.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (n, *model.input_shape[1:])).astype(np.float32)


def tflite_graph(data):
    """(interpreter, ops, tensor details by index) of a TFLite file, built-in kernels only (no delegate)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return it, it._get_ops_details(), {t["index"]: t for t in it.get_tensor_details()}
