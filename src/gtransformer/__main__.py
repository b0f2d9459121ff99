from gtransformer.cli import main

raise SystemExit(main())
