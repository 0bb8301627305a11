from randkit.cli import run

run()
