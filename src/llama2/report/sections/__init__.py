"""One module per section of the demo's report (pretrain, generate, chat, sft, reward, rejection, ppo, gatt,
safety, evaluation, formats), each a `run(demo, section, *artifacts) -> Done[artifact]`; `data` builds what they
read first, `artifacts` holds what they hand on, `common` what they share."""
