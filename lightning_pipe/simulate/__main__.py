"""``python -m lightning_pipe.simulate``: the ``lightning-pipe-simulate`` command. (A ``__main__`` of its own: the
package imports the simulator before ``-m`` would run it as a script, which runpy warns about.)"""

from lightning_pipe.simulate import main

raise SystemExit(main())
