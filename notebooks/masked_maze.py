"""A small action-masked gridworld written against gymnax's Environment API, for
notebooks/03_entropy_collapse.ipynb.

The agent walks a 7x7 maze towards a goal that moves every episode. Moves into a wall or
off the grid are illegal, and the env says so through `action_mask`, which ppo_jax picks up
on its own (see "Environment" in ppo_jax.py). So the number of legal actions changes from
cell to cell: 1 to 4 moves, plus "stay", which is always legal.

Reward: +1 for reaching the goal (the episode ends), -0.01 per step otherwise; an episode
is cut off after 50 steps. The observation is two one-hot maps, the agent's cell and the
goal's cell (98 numbers).
"""

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

SIZE = 7
# 1 = wall. Two walls with gaps, so some goals need a detour.
WALLS = jnp.array([
    [0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0, 0],
    [0, 1, 1, 1, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 0],
    [1, 1, 0, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0],
    [0, 1, 0, 0, 1, 0, 0],
], bool)
MOVES = jnp.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]])  # up, down, left, right, stay
FREE = jnp.argwhere(~WALLS, size=int((~WALLS).sum()))  # [cells, 2]


@struct.dataclass
class MazeState(environment.EnvState):
    pos: jax.Array  # [2] row, column
    goal: jax.Array  # [2]
    time: int


class MaskedMaze(environment.Environment):
    @property
    def default_params(self):
        return environment.EnvParams(max_steps_in_episode=50)

    @property
    def name(self):
        return "MaskedMaze"

    def _legal(self, pos):
        target = pos + MOVES  # [5, 2]
        inside = jnp.all((target >= 0) & (target < SIZE), axis=1)
        clipped = jnp.clip(target, 0, SIZE - 1)
        return inside & ~WALLS[clipped[:, 0], clipped[:, 1]]

    def action_mask(self, state, params):
        return self._legal(state.pos)

    def step_env(self, key, state, action, params):
        # An illegal action is never sampled under the mask; without one it means "stay".
        move = jnp.where(self._legal(state.pos)[action], MOVES[action], 0)
        pos = state.pos + move
        reached = jnp.all(pos == state.goal)
        reward = jnp.where(reached, 1.0, -0.01)
        state = MazeState(pos=pos, goal=state.goal, time=state.time + 1)
        # gymnax's step() adds truncation (time >= max_steps_in_episode) and auto-resets.
        return self.get_obs(state), state, reward, reached, {}

    def reset_env(self, key, params):
        pos_key, goal_key = jax.random.split(key)
        pos = FREE[jax.random.randint(pos_key, (), 0, FREE.shape[0])]
        offset = jax.random.randint(goal_key, (), 1, FREE.shape[0])  # never the start cell
        start = jnp.argmax(jnp.all(FREE == pos, axis=1))
        goal = FREE[(start + offset) % FREE.shape[0]]
        state = MazeState(pos=pos, goal=goal, time=0)
        return self.get_obs(state), state

    def is_terminated(self, state, params):
        return jnp.all(state.pos == state.goal)

    def get_obs(self, state, params=None, key=None):
        grid = lambda p: jnp.zeros((SIZE, SIZE)).at[p[0], p[1]].set(1.0).ravel()
        return jnp.concatenate([grid(state.pos), grid(state.goal)])

    @property
    def num_actions(self):
        return 5

    def action_space(self, params=None):
        return spaces.Discrete(5)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (2 * SIZE * SIZE,))
