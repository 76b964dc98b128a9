from lightning_pipe.tuning.microbatches import main

raise SystemExit(main())
