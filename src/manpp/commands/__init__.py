"""The commands: cli (the parser and dispatch) and one module per command or what only commands use:
compare, bench, describe, plan (with strategies, forecast and accuracycost), export, predict, settingslist.
"""
