"""Where in the final decoder layer a key is read (paper, Table 5).

Names only, no torch: the command line offers them as choices before any model loads;
knnlm.core.model finds the modules behind them.
"""

KEY_POINTS = {
    "ffn_input": "input of the final layer's feed-forward block, after its norm (paper's best)",
    "ffn_output": "output of the final layer's feed-forward block",
    "attn_input": "input of the final layer's attention block, after its norm",
    "attn_output": "output of the final layer's attention block",
    "final": "final hidden state (input of the output embedding)",
}
DEFAULT_KEY_POINT = "ffn_input"
