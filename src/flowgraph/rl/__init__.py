"""RL batteries: a tiny GPT with KV-cache sampling, a character tokenizer, PPO and GRPO
math, rule-rewarded synthetic tasks, and ready ``TorchModule``s built on them.

    from flowgraph.rl.modules import PolicyInference, PolicyTrainer  # the modules
    from flowgraph.rl.ppo import gae, policy_loss                    # the math

``examples/ppo.py``, ``grpo.py``, ``rloo.py``, ``reinforce_pp.py``, ``dapo.py``, ``dpo.py``
and ``custom_engine.py`` use them; ``flowgraph.rl.rewards`` holds the verifiable rewards.
"""
