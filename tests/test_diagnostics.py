"""Learning diagnostics against NumPy: policy sharpness, KL extremes, the critic's error,
and how far the optimizer moved each network."""

import jax
import jax.numpy as jnp
import numpy as np

import ppo_jax as P
from helpers import build, compiled_as_users, jitted_train, numpy_log_softmax, tiny_config
from test_loss import random_batch


def test_max_prob_and_normalized_entropy_match_numpy_with_masks():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    mask = rng.random((6, 5)) < 0.6
    mask[:, 0] = True
    mask[0] = [True, False, False, False, False]  # one legal action: certain, entropy 0
    mask[1] = True  # all legal
    pi = P.Categorical(jnp.where(mask, logits, P.MASKED_LOGIT), jnp.asarray(mask))
    for row in range(6):
        legal = logits[row][mask[row]]
        log_p = numpy_log_softmax(legal)
        p = np.exp(log_p)
        entropy = -(p * log_p).sum()
        want = entropy / np.log(len(legal)) if len(legal) > 1 else 0.0
        np.testing.assert_allclose(pi.max_prob()[row], p.max(), rtol=1e-5)
        np.testing.assert_allclose(pi.normalized_entropy()[row], want, rtol=1e-5, atol=1e-7)
    uniform = P.Categorical(jnp.zeros((1, 4)))
    np.testing.assert_allclose(uniform.normalized_entropy(), 1.0, rtol=1e-6)


def test_loss_reports_the_largest_per_sample_kl_and_policy_sharpness():
    config = tiny_config(env="Acrobot-v1")
    _, _, spec, agent, state = build(config)
    batch = random_batch(spec, agent, state.params)
    _, info = P.ppo_loss(state.params, agent, batch, 0.2, 0.5, 0.01)
    log_p = numpy_log_softmax(agent.policy(state.params, batch.obs).logits)
    log_ratio = log_p[np.arange(len(batch.action)), batch.action] - batch.log_prob
    kl = np.exp(log_ratio) - 1 - log_ratio
    np.testing.assert_allclose(info.approx_kl_max, kl.max(), rtol=1e-4)
    assert float(info.approx_kl_max) > float(info.approx_kl)
    np.testing.assert_allclose(info.max_prob, np.exp(log_p).max(-1).mean(), rtol=1e-5)


def test_summarize_update_matches_numpy():
    rng = np.random.default_rng(1)
    E, M, B = 3, 2, 16  # epochs, minibatches, samples
    ran = np.array([True, True, False])  # the third epoch was skipped by target_kl
    f = lambda *shape: jnp.asarray(rng.random(shape).astype(np.float32))
    loss = P.LossInfo(*(f(E, M) for _ in range(len(P.LossInfo._fields))))
    grad_norm = f(E, M)
    infos = P.UpdateInfo(loss, grad_norm, grad_norm > 0.5)
    batch = P.Batch(f(B, 3), f(B), f(B), f(B), f(B) - 0.3, f(B), None)
    before = {"actor": {"w": f(4, 3), "b": f(3)}, "critic": {"w": f(4, 1)}}
    after = jax.tree.map(lambda x: x + 0.01 * f(*x.shape), before)
    finished = P.FinishedEpisodes(jnp.int32(2), jnp.float32(30.0), jnp.int32(40))
    spec = P.EnvSpec((3,), True, 3, None, None, False)
    metrics = P.summarize_update(spec, finished, batch, infos, jnp.asarray(ran), before, after,
                                 1e-3, 0.01)

    kept = lambda x: np.asarray(x)[ran]  # only the epochs that ran count
    np.testing.assert_allclose(metrics["grad_clip_fraction"], np.mean(kept(grad_norm) > 0.5))
    np.testing.assert_allclose(metrics["approx_kl_max"], kept(loss.approx_kl_max).max())
    np.testing.assert_allclose(metrics["max_prob"], kept(loss.max_prob).mean(), rtol=1e-6)
    value, target, adv = (np.asarray(x, np.float64) for x in (batch.value, batch.target,
                                                              batch.advantage))
    np.testing.assert_allclose(metrics["value_rmse"], np.sqrt(np.mean((value - target) ** 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["advantage_mean"], adv.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["advantage_std"], adv.std(), rtol=1e-5)
    np.testing.assert_allclose(metrics["episode_return"], 15.0)
    for net in ("actor", "critic"):
        flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p[net])])
        step = np.linalg.norm(flat(after) - flat(before))
        np.testing.assert_allclose(metrics[f"{net}_update_norm"], step, rtol=1e-4)
        np.testing.assert_allclose(metrics[f"{net}_update_ratio"],
                                   step / np.linalg.norm(flat(before)), rtol=1e-4)
        np.testing.assert_allclose(metrics[f"{net}_param_norm"], np.linalg.norm(flat(after)),
                                   rtol=1e-5)


def test_training_logs_the_diagnostics_and_discrete_ones_only_for_discrete_actions():
    discrete = jitted_train(tiny_config())(P.make_key(0))[1]
    continuous = jax.jit(P.make_train(tiny_config(env="Pendulum-v1")))(P.make_key(0))[1]
    shared = {"approx_kl_max", "value_rmse", "advantage_mean", "advantage_std",
              "grad_clip_fraction", "actor_update_ratio", "critic_update_ratio",
              "actor_param_norm", "critic_update_norm"}
    assert shared | {"max_prob", "entropy_normalized"} <= set(discrete)
    assert shared <= set(continuous) and "max_prob" not in continuous
    for metrics in (discrete, continuous):
        assert all(np.isfinite(np.asarray(metrics[k])).all() for k in shared)
        assert (np.asarray(metrics["actor_update_norm"]) > 0).all()
    assert (np.asarray(discrete["approx_kl_max"]) >= np.asarray(discrete["approx_kl"])).all()


# ── the costlier diagnostics (--diagnostics) ──────────────────────────────────────────────


def numpy_hidden(params, obs, activation):
    """The hidden activations of a torso, layer by layer, in plain NumPy."""
    act = np.tanh if activation == "tanh" else (lambda x: np.maximum(x, 0.0))
    torso = params["params"]["Torso_0"]
    x, layers = np.asarray(obs, np.float64), []
    for i in range(len([k for k in torso if k.startswith("Dense")])):
        dense = torso[f"Dense_{i}"]
        x = act(x @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"]))
        layers.append(x)
    return layers


def test_representation_diagnostics_match_numpy():
    rng = np.random.default_rng(2)
    for activation in ("relu", "tanh"):
        config = tiny_config(activation=activation, hidden_sizes=(32, 16))
        _, _, spec, agent, state = build(config)
        # large inputs saturate some tanh units and silence some ReLUs
        probe = jnp.asarray(rng.normal(scale=3.0, size=(100, *spec.obs_shape)), jnp.float32)
        got = P.representation_diagnostics(agent, state.params, probe, activation)
        for net in ("actor", "critic"):
            layers = numpy_hidden(state.params[net], probe, activation)
            if activation == "relu":
                scores = [np.abs(h).mean(0) / np.abs(h).mean(0).mean() for h in layers]
                want = np.mean(np.concatenate(scores) <= 0.025)
                np.testing.assert_allclose(got[f"{net}_dormant_fraction"], want, atol=1e-6)
            else:
                want = np.mean(np.concatenate([(np.abs(h) > 0.99).ravel() for h in layers]))
                np.testing.assert_allclose(got[f"{net}_saturated_fraction"], want, atol=1e-6)
                assert want > 0, "the probe should saturate some units"
            eigenvalues = np.linalg.eigvalsh(np.cov(layers[-1].T, bias=True))
            np.testing.assert_allclose(got[f"{net}_feature_rank"],
                                       eigenvalues.sum() ** 2 / (eigenvalues**2).sum(), rtol=1e-3)


def test_exploration_split_matches_per_sample_gradients_taken_one_by_one():
    config = tiny_config(env="Acrobot-v1")
    _, _, spec, agent, state = build(config)
    batch = random_batch(spec, agent, state.params, B=64)
    got = P.exploration_split(agent, state.params, batch, n=16)
    index = np.arange(16) * 4  # spread evenly over the 64 samples
    adv = (np.asarray(batch.advantage) - np.mean(batch.advantage)) / (np.std(batch.advantage) + 1e-8)
    greedy_norms, explore_norms = [], []
    for i in index:
        def loss(actor_params):
            pi = agent.actor.apply(actor_params, batch.obs[i:i + 1])
            return -adv[i] * pi.log_prob(jnp.asarray(batch.action[i:i + 1]))[0]
        grads = jax.grad(loss)(state.params["actor"])
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
        logits = np.asarray(agent.policy(state.params, batch.obs[i:i + 1]).logits)[0]
        (greedy_norms if batch.action[i] == logits.argmax() else explore_norms).append(norm)
    assert greedy_norms and explore_norms, "the sample should hold both kinds of actions"
    assert int(got["greedy_count"]) == len(greedy_norms)
    assert int(got["explore_count"]) == len(explore_norms)
    np.testing.assert_allclose(got["pg_norm_greedy"], np.mean(greedy_norms), rtol=1e-4)
    np.testing.assert_allclose(got["pg_norm_explore"], np.mean(explore_norms), rtol=1e-4)


def test_loss_term_gradients_add_up_to_the_actor_and_critic_gradients():
    config = tiny_config(env="Acrobot-v1")
    _, _, spec, agent, state = build(config)
    batch = random_batch(spec, agent, state.params)
    hp = config.hparams()
    got = P.loss_term_grad_norms(agent, state.params, batch, hp, 0.05, False)
    term = lambda pick: jax.grad(lambda p: pick(P.ppo_loss(p, agent, batch, hp.clip_eps,
                                                           hp.vf_coef, 0.05)[1]))(state.params)
    policy = term(lambda i: i.policy_loss)
    entropy = term(lambda i: 0.05 * i.entropy)
    value = term(lambda i: hp.vf_coef * i.value_loss)
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(tree))))
    np.testing.assert_allclose(got["grad_norm_policy_actor"], norm(policy["actor"]), rtol=1e-4)
    np.testing.assert_allclose(got["grad_norm_entropy_actor"], norm(entropy["actor"]), rtol=1e-4)
    np.testing.assert_allclose(got["grad_norm_value_critic"], norm(value["critic"]), rtol=1e-4)
    assert norm(value["actor"]) == 0 and norm(policy["critic"]) == 0  # separate networks


def test_diagnostics_do_not_change_training_and_turn_off_completely():
    key = P.make_key(0)
    on, off = (compiled_as_users(jax.jit(P.make_train(tiny_config(diagnostics=d))), key)(key)[1]
               for d in (True, False))
    extra = {"grad_norm_policy_actor", "pg_norm_greedy", "greedy_count", "actor_feature_rank",
             "critic_saturated_fraction"}
    assert extra <= set(on) and not extra & set(off)
    for name, values in off.items():
        np.testing.assert_array_equal(np.asarray(on[name]), np.asarray(values), err_msg=name)
