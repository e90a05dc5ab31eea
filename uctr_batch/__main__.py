from uctr_batch.cli import main

raise SystemExit(main())
