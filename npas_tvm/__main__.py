from npas_tvm.cli import main

raise SystemExit(main())
