from kubectl_finetune.main import main

main()
