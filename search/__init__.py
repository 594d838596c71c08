"""The search side of NPAS: choosing a pruning plan for a model.

``rule_mapper``: the rule-based mapping of schemes, blocks and rates by layer type and
shape (Gong et al., TODAES'22). Every mapper produces an ordinary plan
(``npas_tvm.plan.Plan``), the one thing the search and the compiler share.
"""
